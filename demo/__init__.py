"""`make demo`: the whole loop on a bundled synthetic task the base model fails at (demo.tickets)."""
