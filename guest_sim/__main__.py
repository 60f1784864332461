import os
import sys

from guest_sim.main import main

code = main()
sys.stdout.flush()
# os._exit: vCPU threads may be blocked in a fault that will never be served.
os._exit(code)
