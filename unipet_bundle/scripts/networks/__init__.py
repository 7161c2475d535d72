"""Networks: the UniPET generator (base denoising network + style alignment network) and the critic."""
