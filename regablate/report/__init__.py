"""The report of a grid's folder: results tables, Figure 8 and the paper's values to compare with."""
