"""`python -m curate.demo prepare|serve|cg|summary`: the offline demo (see run.py)."""
import sys

from curate.demo.run import main

sys.exit(main())
