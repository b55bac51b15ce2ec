"""One module per command-line verb (see ``forwardlearn.cli``)."""
