"""Tests of bnport.model (architectures, loading, the one model resolver, snapshots)."""
