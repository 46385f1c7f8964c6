"""lbctl, the operator's command line: a client of the REST API, plus `serve` and the lab."""
