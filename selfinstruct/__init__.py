"""Self-Instruct for crypto news: instruction data from seed tasks, a model, and our articles.

    python -m selfinstruct --out out/selfinstruct          # see selfinstruct/pipeline.py for every flag

Modules, in pipeline order: seeds (seed tasks), bootstrap (new instructions), instances (classification check and
instances), grounding (tasks on our articles), prepare (train.jsonl / val.jsonl), with rouge (the ROUGE-L filter)
and store (JSONL state, downloads).
"""
