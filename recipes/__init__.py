"""How models were made; not part of the installed package (each recipe has a README)."""
