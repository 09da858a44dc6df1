from services.chat_ai.service import main
from shared.runtime.runner import run

run(main)
