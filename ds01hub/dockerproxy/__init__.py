"""The Docker socket filter proxy: the socket edge (`server`), the strict HTTP/1.1 framing
(`http`), the pure policy (`policy`) and reading a build's context (`build_context`)."""
