"""PET data tools: SUV conversion, simulation, paired-dataset layout, datalists, importers."""
