"""ipywidgets wizards for notebooks: project init, image builder, quota panel."""
