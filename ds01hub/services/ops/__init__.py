"""ds01-ops: the GPU-aware culler, the lifecycle pass, the state metrics and the admin page (see
`app`)."""
