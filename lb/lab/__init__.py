"""The network lab (namespaces, veths, servers) and the demos; product code never imports it."""
