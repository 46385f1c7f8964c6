"""xlb REST API."""
