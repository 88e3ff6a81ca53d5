"""`python -m bnport` runs the command line (also what `torchrun -m bnport` starts on each rank)."""
from bnport.cli import main

if __name__ == "__main__":
    main()
