"""Names every layer agrees on. IGNORE: the class id that cross-entropy, SupCon's CE side and the metrics skip
(DFC2020's unlabelled and excluded classes, METER-ML's excluded negatives). The Sentinel-2 band names in the order
of DFC2020 / SEN12MS stacks: L1C's 13, and L2A's 12 (no B10)."""
IGNORE = 255
L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
L2A_BANDS = tuple(band for band in L1C_BANDS if band != "B10")
