"""`python -m chatapp.prompts ...`."""
import sys

from chatapp.prompts.cli import main

sys.exit(main())
