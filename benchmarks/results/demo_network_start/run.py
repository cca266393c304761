import sys

if __name__ == "__main__":
    if sys.argv[1] == "nospread":
        from simmerge_bandit import descriptor
        descriptor.SPREAD = ()
        descriptor._memo = None
    from simmerge_bandit.cli import cli
    sys.argv = ["simmerge", "--home", sys.argv[2], "demo", "--json"]
    cli()
