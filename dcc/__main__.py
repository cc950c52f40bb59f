"""python -m dcc: the dcc command."""
from dcc.cli.main import main

if __name__ == "__main__":
    main()
