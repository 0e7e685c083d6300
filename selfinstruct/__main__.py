"""python -m selfinstruct --out out/selfinstruct ...  (see selfinstruct/pipeline.py)"""
from selfinstruct.pipeline import main

if __name__ == "__main__":
    main()
