"""`python -m evaluate ...`: see evaluate/commands.py."""
from evaluate.commands import main

main()
