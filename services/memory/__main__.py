from services.memory.service import main
from shared.runtime.runner import run

run(main)
