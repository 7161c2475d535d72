"""Losses: style alignment (L_align) and the region-aware adversarial terms (RALS)."""
