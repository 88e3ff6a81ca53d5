"""The report stage: what the plots show, computed from a run (`data`), and the PNG plots and report.md drawn from it
(`write`). Imports every earlier stage's results, never the other way round."""
from bnport.report.data import ReportData, report_data
from bnport.report.write import write_report

__all__ = ["ReportData", "report_data", "write_report"]
