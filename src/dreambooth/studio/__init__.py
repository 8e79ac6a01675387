"""`dreambooth studio`: the whole job in a browser, over the same library as the command line."""
