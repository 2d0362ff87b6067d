"""The fork's delta against the pinned upstream (data: the pin, the notes), installed with the package."""
