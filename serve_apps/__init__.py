"""Ray Serve applications of phi1_ray (``serve run serve_apps.phi1:app``)."""
