"""The label every layer agrees on: IGNORE, the class id that cross-entropy, SupCon's CE side and the metrics skip
(DFC2020's unlabelled and excluded classes, METER-ML's excluded negatives)."""
IGNORE = 255
