"""The FUSE protocol: wire ABI, the server that parses and dispatches requests, and the Filesystem API."""
