"""`python -m bench [--threads N] [--ds12 PATH] [--against LLAMA_BENCH] ...`: see bench/suite.py."""
import sys

from bench.suite import main

sys.exit(main())
