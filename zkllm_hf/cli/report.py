def cmd_report(args):
    raise NotImplementedError
