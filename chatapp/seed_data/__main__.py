"""`python -m chatapp.seed_data`: rebuild seed.jsonl and golden.jsonl from ../shared/data."""
from chatapp.seed_data import main

main()
