# Installed with ds01hub into {sys.prefix}/etc/ipython, where every IPython kernel of that
# environment reads it: the idle culler's warning shows up in the output of the next cell run
# (ds01hub.server_extension.cull_notice).
c.InteractiveShellApp.extensions.append("ds01hub.server_extension.cull_notice")  # noqa: F821
