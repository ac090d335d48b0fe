"""Drawing: graphviz trees, matplotlib plots, the HTML report and the headless-browser check of it."""
