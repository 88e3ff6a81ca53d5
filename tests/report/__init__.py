"""Tests of bnport.report (the numbers behind each plot, the files written)."""
