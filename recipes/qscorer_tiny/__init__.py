"""qscorer-tiny, the bundled default model: how it was made (README.md). Not part of the package."""
