"""Running several LB hosts as one fleet (BGP announcement, shared state)."""
