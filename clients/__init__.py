"""Python clients for the served ensemble (see clients.client and `python -m clients --help`)."""
