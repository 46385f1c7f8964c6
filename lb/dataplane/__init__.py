"""The data plane's interface: the only code that imports bcc or pyroute2 or calls bpf(2)."""
