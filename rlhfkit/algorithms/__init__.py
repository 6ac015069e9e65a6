"""One file per algorithm: setup, then the loop with numbered phases, then logging and saving."""
