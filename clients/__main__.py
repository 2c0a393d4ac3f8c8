import sys

from clients.cli import get_args_parser, main

sys.exit(main(get_args_parser().parse_args()))
