"""Tests of bnport.data (image folders, .bin packs, RecordIO, alignment, IJB releases, pair lists)."""
