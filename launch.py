"""Start the chat app: `python launch.py [--share] [--auth USER:PASS] [--host H] [--port P] [--model M] ...`."""
import sys

from chatapp.cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
