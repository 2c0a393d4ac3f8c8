from perf.report import get_args_parser, main
from serve import stop_on_signals

stop_on_signals()  # Ctrl-C and `kill` stop it through its cleanup: every server and load generator it started stops
main(get_args_parser().parse_args())
