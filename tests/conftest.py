import sys
from pathlib import Path

# test helpers (official_layout, official_runner) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
