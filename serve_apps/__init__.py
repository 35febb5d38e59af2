"""Ray Serve applications (``serve run serve_apps.phi1:app``)."""
