from perf.report import get_args_parser, main

main(get_args_parser().parse_args())
