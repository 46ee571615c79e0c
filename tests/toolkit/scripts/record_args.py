"""A third-party-style script for the external launcher test: records argv, cwd and env, exits as asked."""
import json
import os
import sys

if __name__ == "__main__":
    argv = sys.argv[1:]
    out = os.environ["RECORD_TO"]
    with open(out, "w") as f:
        json.dump({"argv": argv, "cwd": os.getcwd(), "greeting": os.environ.get("GREETING")}, f)
    code = int(argv[argv.index("--exit_code") + 1]) if "--exit_code" in argv else 0
    sys.exit(code)
