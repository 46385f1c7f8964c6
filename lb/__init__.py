"""xlb control plane."""
