"""Local tooling for the memory mesh: embedded data stores, the stack launcher, the CLI."""
