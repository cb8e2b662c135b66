"""Below every stage: errors, atomic files, devices, image conversions, plots, Hub downloads.

Nothing here imports any other part of pathgan."""
