from udpflannel.cli import main

raise SystemExit(main())
